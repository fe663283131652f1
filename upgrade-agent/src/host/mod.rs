//! What runs inside an instance (emulated) or a kernel (LUO host agent): the workload
//! supervisor ([`supervisor`]: start, freeze, restore, stop), its local control protocol
//! ([`ctl`]), and the receiving end of the inter-instance channel ([`receiver`]).

pub mod adopt;
pub mod checkpoint;
pub mod ctl;
pub mod launch;
pub mod notify;
pub mod peer;
pub mod receiver;
pub mod supervisor;
pub mod watch;
