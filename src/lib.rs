pub mod fingerprint;
pub mod datastore;
pub mod npy;
