//! What touches the network: the identities sites prove to each other with
//! mutual TLS ([`tls`]) and the QUIC driver ([`quic`]) that runs a sans-IO
//! [`protocol`](crate::protocol) session per peer over two streams, with
//! reconnection and status. Nothing outside this module (and `sync-node`)
//! knows about certificates, sockets or QUIC.
//! [`relay`] is a fault-injecting UDP relay on 127.0.0.1 for tests and benchmarks.
//! [`rpc`] carries the strong tier's calls on streams of their own.

pub mod quic;
pub mod relay;
pub mod rpc;
pub mod tls;
