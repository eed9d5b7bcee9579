//! The MedSplit coordinator: REST API, scheduling on Postgres and the server-side layers of every
//! job. Its server half is `medsplit_engine::protocol::ServerSession`, driven today in-process by
//! `medsplit-bench`; the network service is built on it by the platform work.

pub use medsplit_engine::protocol::ServerSession;
