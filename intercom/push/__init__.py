"""Web Push: ringing a resident's phone with the app closed (RFC 8030, 8291, 8292)."""
