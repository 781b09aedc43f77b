"""Development tooling, not needed in production: the demo, synthetic data, the local stack
(``make up``) and the environment it sets. Not shipped in the Bento."""
