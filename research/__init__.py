"""Research runners (real-data experiments): outside the production package."""
