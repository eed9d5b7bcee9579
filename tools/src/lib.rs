//! The coordinator's clients: the researchers' command line `medsplit` (with `medsplit demo`),
//! the benchmark `medsplit-bench` and the load generator `medsplit-load`. They speak to the
//! coordinator over REST and WebSocket like any other client; the demo and the benchmarks also
//! start the platform's processes on this machine ([`local`]).

pub mod attack;
pub mod inference;
pub mod local;
pub mod relay;
pub mod report;
pub mod spec;
