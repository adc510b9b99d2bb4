//! Wire formats, one module per protocol version so a v2 can live beside v1.

pub mod v1;
