//! HTTP/1.1 on the wire, without I/O: head parsing and field classification ([`head`]),
//! chunked bodies ([`chunked`]) and head writing ([`wire`]). Shared by the fast path (client
//! side) and the one upstream client (upstream side).

pub mod chunked;
pub mod head;
pub mod wire;
