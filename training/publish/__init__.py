"""Publishing: champions -> BentoML models -> Bento -> loopback server -> smoke test."""
