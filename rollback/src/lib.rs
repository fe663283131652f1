//! Crash-safe journal, kernel slots and trial boots.
