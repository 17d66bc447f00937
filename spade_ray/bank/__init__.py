"""The normal bank: its versioned on-storage format, and one shard served in memory (no Ray)."""
