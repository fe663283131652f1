//! `mk-demo-kv`: the demonstration key-value workload.
fn main() {}
