//! The openraft network over the [`Transport`](crate::transport::Transport) seam.

/// Largest RPC message this crate encodes or accepts, bytes.
pub const RPC_BYTES_MAX: usize = 64 << 20;
