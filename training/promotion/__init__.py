"""Promotion: the gate's verdict (``gate``) and the registry aliases it moves (``aliases``)."""
