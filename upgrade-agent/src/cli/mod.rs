//! Command-line front end of `mk-upgrade`: one module per subcommand.
pub mod keys;
pub mod sign;
pub mod state;
