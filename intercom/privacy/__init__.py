"""Privacy by design: zones, face redaction, snapshots and data subject rights."""
