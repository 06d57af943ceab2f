//! The request path: a config turned into a [`generation::Generation`]
//! (routes, access rules, token sources, pools) that [`generation::AppState`]
//! swaps on reload ([`reload`]); the route table ([`routes`]); the handler
//! ([`handler`]: access, route, token, rewrite, forward, replay); the errors
//! the proxy answers itself ([`error`]); the response body it sends
//! ([`body`]) and the access log line written when that body ends
//! ([`access_log`]).
//!
//! Imports the layers below (ground, net, config, store, tokens,
//! connections); must not import admin, server or sandbox.

pub mod access_log;
pub mod body;
pub mod error;
pub mod generation;
pub mod handler;
pub mod reload;
pub mod routes;

pub use handler::{handle, ConnInfo};
