//! The demonstration workload `mk-demo-kv` and its load generator.
