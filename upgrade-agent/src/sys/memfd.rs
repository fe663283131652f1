//! memfd creation and sealing.
