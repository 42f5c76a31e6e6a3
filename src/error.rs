//! Errors as people read them (any thread): an error and its causes on one line.

use std::error::Error;

/// An error and its causes, joined with ": ".
pub fn error_chain(e: &dyn Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
