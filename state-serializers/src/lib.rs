//! Capture and restore of the state a workload needs to come up unchanged in the next kernel.

pub mod fdenv;
