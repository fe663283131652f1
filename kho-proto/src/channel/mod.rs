//! The channel protocol: framed agent-to-agent messages between kernel instances.
