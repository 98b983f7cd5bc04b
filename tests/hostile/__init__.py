"""The bad-input suite: what a hostile peer can send, and what it gets back."""
