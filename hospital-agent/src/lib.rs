//! The MedSplit hospital agent: local data, the client half, labels, loss and the HE secret key.
//! Its client half is `medsplit_engine::protocol::ClientSession`; the daemon around it comes with
//! the platform work. The `medsplit-bench` binary lives here.

pub use medsplit_engine::protocol::ClientSession;
