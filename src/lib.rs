pub mod datastore;
pub mod detox;
pub mod fingerprint;
pub mod generate;
pub mod model;
pub mod npy;
pub mod rule;
pub mod server;
