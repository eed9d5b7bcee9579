//! MedSplit's training engine: what the coordinator and the hospital agents both speak.
//!
//! No I/O happens here (the data loaders aside, which read the files they are pointed at): the
//! model halves, the HE packing and the protocol state machines take and return values and
//! serialized messages, so the same code runs in-process and over a network.

pub mod api;
pub mod data;
pub mod dp;
pub mod dpsgd;
pub mod export;
pub mod he;
pub mod metrics;
pub mod model;
pub mod preprocess;
pub mod protocol;
pub mod synthetic;
pub mod training;
pub mod wfdb;
pub mod wire;
