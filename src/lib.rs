pub mod fingerprint;
pub mod generate;
pub mod model;
pub mod datastore;
pub mod npy;
