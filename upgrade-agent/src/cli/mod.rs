//! Command-line front end of `mk-upgrade`: one module per subcommand.
pub mod keys;
pub mod sign;
pub mod state;
pub mod inspect;
pub mod app;
pub mod demo;
pub mod emu;
pub mod upgrade;
