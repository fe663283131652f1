//! Command-line front end of `mk-upgrade`: one module per subcommand.
pub mod app;
pub mod demo;
pub mod emu;
pub mod inspect;
pub mod keys;
pub mod load;
pub mod sign;
pub mod state;
pub mod upgrade;
