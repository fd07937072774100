//! Library errors → gRPC status codes.
//!
//! The code tells a client whether to fix its request (`INVALID_ARGUMENT`), fix the server's
//! setup (`FAILED_PRECONDITION`), send less (`RESOURCE_EXHAUSTED`) or retry/report
//! (`INTERNAL`); the message is the library error's own sentence, which names the field and the
//! expected value. Internal errors are also logged, since no client can act on them.

use tonic::{Code, Status};

use super::convert::ConvertError;
use crate::datastore::DatastoreError;
use crate::detox::DetoxError;
use crate::rule::RuleError;
use crate::steps::StepError;

impl From<StepError> for Status {
    fn from(err: StepError) -> Self {
        match err {
            StepError::Engine(e) => from_detox(e),
            StepError::Dropped => Status::internal(err.to_string()),
            StepError::ShuttingDown => Status::unavailable(err.to_string()),
        }
    }
}

/// Rewrites tonic's decode errors into codes a client can act on: "message too large" into
/// `RESOURCE_EXHAUSTED` with a sentence that says what to do, and a body that is not valid
/// protobuf (which tonic-prost answers `INTERNAL`) into `INVALID_ARGUMENT`: the request is
/// at fault, not the server.
pub(crate) fn map_decode_error(status: Status, limit: usize) -> Status {
    if status.code() == Code::Internal
        && status
            .message()
            .starts_with("failed to decode Protobuf message")
    {
        return Status::invalid_argument(format!(
            "the request is not a valid protobuf message: {}",
            status.message()
        ));
    }
    if status.code() == Code::OutOfRange && status.message().contains("message length too large") {
        Status::resource_exhausted(format!(
            "request message too large: {}; this server accepts at most {limit} bytes per message (--max-message-bytes): send fewer rows per request, f16 instead of f32, or the sparse form without logits",
            status.message().trim_start_matches("Error, ")
        ))
    } else {
        status
    }
}

pub fn from_convert(err: ConvertError) -> Status {
    match err {
        ConvertError::TooManyRows { .. } => Status::resource_exhausted(err.to_string()),
        _ => Status::invalid_argument(err.to_string()),
    }
}

fn datastore_code(err: &DatastoreError) -> Code {
    match err {
        DatastoreError::DimMismatch { .. }
        | DatastoreError::NonFinite { .. }
        | DatastoreError::F16Overflow { .. }
        | DatastoreError::EmptyAppend
        | DatastoreError::ValueCountMismatch { .. }
        | DatastoreError::ValueOutOfVocab { .. }
        | DatastoreError::BadProvenance { .. }
        | DatastoreError::BadSources(_)
        | DatastoreError::BadK(_)
        | DatastoreError::BadEf(_)
        | DatastoreError::KeyTypeMismatch { .. }
        | DatastoreError::ModelMismatch(_) => Code::InvalidArgument,
        DatastoreError::EmptyStore(_) => Code::FailedPrecondition,
        DatastoreError::Unavailable { .. } => Code::Unavailable,
        DatastoreError::TimedOut { .. } => Code::DeadlineExceeded,
        DatastoreError::Io { source, .. } if is_disk_full(source) => Code::ResourceExhausted,
        _ => Code::Internal,
    }
}

fn is_disk_full(err: &std::io::Error) -> bool {
    // ENOSPC (28) and EDQUOT (122 on Linux): the disk or the quota is full.
    matches!(err.raw_os_error(), Some(28) | Some(122))
        || err.kind() == std::io::ErrorKind::StorageFull
}

pub fn from_datastore(context: &str, err: DatastoreError) -> Status {
    let code = datastore_code(&err);
    let message = format!("{context}: {err}");
    if code == Code::Internal {
        tracing::error!(%message, "datastore failure");
    }
    Status::new(code, message)
}

pub fn from_detox(err: DetoxError) -> Status {
    let code = match &err {
        DetoxError::HiddenShape { .. }
        | DetoxError::EmptyBatch
        | DetoxError::NonFiniteHidden { .. }
        | DetoxError::HiddenOutOfRange { .. }
        | DetoxError::LogitsShape { .. }
        | DetoxError::Param(_)
        | DetoxError::Variant(_)
        | DetoxError::SkipNeedsLogits
        | DetoxError::Reuse(_) => Code::InvalidArgument,
        DetoxError::TooManyRows { .. } => Code::ResourceExhausted,
        DetoxError::Row { source, .. } => match source {
            RuleError::Param(_)
            | RuleError::LogitsLen { .. }
            | RuleError::NonFiniteLogit(_)
            | RuleError::LogitTooLarge { .. }
            | RuleError::EmptyDistribution
            | RuleError::NotInMode { .. } => Code::InvalidArgument,
            RuleError::TokenOutOfVocab { .. }
            | RuleError::NoNeighbours
            | RuleError::GateNeedsRows { .. }
            | RuleError::NoPrior { .. } => Code::FailedPrecondition,
            RuleError::NonFiniteDistance(_) => Code::Internal,
        },
        DetoxError::Search { source, .. } => datastore_code(source),
        DetoxError::ModeNeeds { .. }
        | DetoxError::NoStores
        | DetoxError::TooManyStores(_)
        | DetoxError::EmptyStore { .. }
        | DetoxError::Incompatible { .. }
        | DetoxError::KeyTypeMismatch { .. }
        | DetoxError::UnknownVocab
        | DetoxError::NoPrior { .. } => Code::FailedPrecondition,
    };
    let message = err.to_string();
    if code == Code::Internal {
        tracing::error!(%message, "engine failure");
    }
    Status::new(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_who_must_act() {
        assert_eq!(
            from_detox(DetoxError::EmptyBatch).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            from_detox(DetoxError::TooManyRows { rows: 9, max: 8 }).code(),
            Code::ResourceExhausted
        );
        let full = DatastoreError::Io {
            op: "writing",
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        assert_eq!(
            from_datastore("append", full).code(),
            Code::ResourceExhausted
        );
        assert_eq!(
            from_datastore("append", DatastoreError::EmptyAppend).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            from_convert(ConvertError::TooManyRows {
                what: "hidden",
                rows: 3,
                max: 2
            })
            .code(),
            Code::ResourceExhausted
        );
    }

    #[test]
    fn a_remote_store_that_fails_is_unavailable_or_late_not_internal() {
        let search = |source| DetoxError::Search {
            name: "toxic".into(),
            source,
        };
        let down = from_detox(search(DatastoreError::Unavailable {
            location: "milvus://127.0.0.1:19530/toxic".into(),
            reason: "connection refused".into(),
        }));
        assert_eq!(down.code(), Code::Unavailable);
        assert!(down.message().contains("milvus://127.0.0.1:19530/toxic"));
        let late = from_detox(search(DatastoreError::TimedOut {
            location: "milvus://127.0.0.1:19530/toxic".into(),
            after: std::time::Duration::from_millis(250),
        }));
        assert_eq!(late.code(), Code::DeadlineExceeded);
    }
}
