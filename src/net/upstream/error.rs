//! Why an exchange with an upstream failed: [`SendError`], and its
//! [`ErrorKind`] (the `kind` metric label) read from the source chain.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use super::conn::ExchangeError;

/// Why an exchange with the upstream failed.
#[derive(Debug)]
pub struct SendError {
    /// What kind of failure (the metric label).
    pub kind: ErrorKind,
    /// The client's own request body broke (its fault, not the upstream's).
    pub client_body: bool,
    /// The underlying error, for debug logs.
    pub source: Box<dyn StdError + Send + Sync>,
}

impl SendError {
    pub(super) fn connect(e: Box<dyn StdError + Send + Sync>) -> SendError {
        let kind = match ErrorKind::scan(&*e) {
            Some(k) => k,
            None => ErrorKind::Connect,
        };
        SendError {
            kind,
            client_body: false,
            source: e,
        }
    }

    /// The same error, and a handle to hand it to others too.
    pub(super) fn share(self) -> (SendError, Arc<dyn StdError + Send + Sync>) {
        let shared: Arc<dyn StdError + Send + Sync> = Arc::from(self.source);
        let e = SendError {
            kind: self.kind,
            client_body: self.client_body,
            source: Box::new(Arc::clone(&shared)),
        };
        (e, shared)
    }

    /// No answer before the request's deadline.
    pub(super) fn timeout() -> SendError {
        SendError::wire(ExchangeError::Timeout)
    }

    /// An HTTP/1.1 exchange's failure.
    pub(super) fn wire(e: ExchangeError) -> SendError {
        let client_body = matches!(e, ExchangeError::ClientBody(_));
        let kind = match e {
            ExchangeError::Timeout => Some(ErrorKind::Timeout),
            _ => ErrorKind::scan(&e),
        };
        SendError {
            kind: kind.unwrap_or(ErrorKind::Protocol),
            client_body,
            source: Box::new(e),
        }
    }

    pub(super) fn exchange(e: hyper::Error) -> SendError {
        // hyper reports a failing request body as a "user body" error whose
        // cause is the inbound connection's own hyper::Error.
        let client_body = e.is_user() && e.source().is_some_and(|c| c.is::<hyper::Error>());
        SendError {
            kind: ErrorKind::scan(&e).unwrap_or(ErrorKind::Protocol),
            client_body,
            source: Box::new(e),
        }
    }
}

/// What went wrong talking to an upstream (the `kind` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// TCP connect failed or was refused.
    Connect,
    /// TLS handshake or certificate verification failed.
    Tls,
    /// The request timeout passed.
    Timeout,
    /// The exchange broke after connecting.
    Protocol,
}

impl ErrorKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Tls => "tls",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Protocol => "protocol",
        }
    }

    /// Classifies an error of hyper-util's client.
    pub fn of(err: &hyper_util::client::legacy::Error) -> ErrorKind {
        ErrorKind::scan(err).unwrap_or(if err.is_connect() {
            ErrorKind::Connect
        } else {
            ErrorKind::Protocol
        })
    }

    /// TLS or timeout, if the error's source chain says so.
    fn scan(err: &(dyn StdError + 'static)) -> Option<ErrorKind> {
        let mut source: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(e) = source {
            if e.is::<rustls::Error>() {
                return Some(ErrorKind::Tls);
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                // hyper-rustls wraps tokio-rustls' io::Error (which wraps the
                // rustls::Error) in another io::Error, and io::Error::source
                // skips the error it wraps: look inside by hand.
                let mut inner = io.get_ref();
                while let Some(i) = inner {
                    if i.is::<rustls::Error>() {
                        return Some(ErrorKind::Tls);
                    }
                    inner = i
                        .downcast_ref::<std::io::Error>()
                        .and_then(std::io::Error::get_ref);
                }
                if io.kind() == std::io::ErrorKind::TimedOut {
                    return Some(ErrorKind::Timeout);
                }
            }
            source = e.source();
        }
        None
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Connect => "connection failed",
            ErrorKind::Tls => "TLS handshake failed",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Protocol => "protocol error",
        })
    }
}
