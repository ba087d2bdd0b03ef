//! What touches the network: the identities sites prove to each other with
//! mutual TLS ([`tls`]) now, and the QUIC driver around the sans-IO
//! [`protocol`](crate::protocol) session next. Nothing outside this module
//! (and `sync-node`) knows about certificates, sockets or QUIC.

pub mod tls;
