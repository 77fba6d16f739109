"""Small shared helpers that have no better home (atomic file writes, hashing)."""
