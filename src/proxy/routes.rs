//! The route table: host match first, then the longest path prefix at a
//! `/` boundary, whatever the order of the routes in the file. Built once
//! per config; lookups allocate nothing.

use std::collections::HashMap;

use crate::config::prefix_matches;

/// Routes by host, each list sorted longest prefix first.
#[derive(Debug)]
pub struct RouteTable<T> {
    by_host: HashMap<Box<str>, Vec<(Box<str>, T)>>,
    any_host: Vec<(Box<str>, T)>,
}

impl<T> RouteTable<T> {
    /// Builds the table from `(host, path_prefix, value)`; hosts lower-case.
    pub fn new(routes: impl IntoIterator<Item = (Option<String>, String, T)>) -> Self {
        let mut by_host: HashMap<Box<str>, Vec<(Box<str>, T)>> = HashMap::new();
        let mut any_host = Vec::new();
        for (host, prefix, value) in routes {
            match host {
                Some(h) => by_host
                    .entry(h.into())
                    .or_default()
                    .push((prefix.into(), value)),
                None => any_host.push((prefix.into(), value)),
            }
        }
        let sort = |v: &mut Vec<(Box<str>, T)>| v.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
        by_host.values_mut().for_each(sort);
        sort(&mut any_host);
        RouteTable { by_host, any_host }
    }

    /// The most specific route for a request: `host` is lower-case, without
    /// port. A host route wins over any host-less one.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&T> {
        fn longest<'a, T>(list: &'a [(Box<str>, T)], path: &str) -> Option<&'a T> {
            list.iter()
                .find(|(prefix, _)| prefix_matches(prefix, path))
                .map(|(_, v)| v)
        }
        host.and_then(|h| self.by_host.get(h))
            .and_then(|list| longest(list, path))
            .or_else(|| longest(&self.any_host, path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable<&'static str> {
        RouteTable::new([
            (None, "/".to_string(), "root"),
            (None, "/api".to_string(), "api"),
            (None, "/api/v2".to_string(), "api-v2"),
            (
                Some("internal.example".to_string()),
                "/".to_string(),
                "internal",
            ),
            (
                Some("internal.example".to_string()),
                "/api".to_string(),
                "internal-api",
            ),
        ])
    }

    #[test]
    fn longest_prefix_wins_regardless_of_order() {
        let t = table();
        assert_eq!(t.find(None, "/api/v2/x"), Some(&"api-v2"));
        assert_eq!(t.find(None, "/api/v1"), Some(&"api"));
        assert_eq!(t.find(None, "/other"), Some(&"root"));
    }

    #[test]
    fn prefix_stops_at_segment_boundary() {
        let t = table();
        assert_eq!(t.find(None, "/apix"), Some(&"root"));
        let only_api = RouteTable::new([(None, "/api".to_string(), 1)]);
        assert_eq!(only_api.find(None, "/apix"), None);
        assert_eq!(only_api.find(None, "/api"), Some(&1));
    }

    #[test]
    fn host_routes_beat_host_less_ones() {
        let t = table();
        assert_eq!(
            t.find(Some("internal.example"), "/api/v2/x"),
            Some(&"internal-api")
        );
        assert_eq!(t.find(Some("internal.example"), "/zzz"), Some(&"internal"));
        assert_eq!(t.find(Some("other.example"), "/api"), Some(&"api"));
    }

    #[test]
    fn host_without_match_falls_back_to_host_less() {
        let t = RouteTable::new([
            (Some("a.example".to_string()), "/only".to_string(), "a"),
            (None, "/".to_string(), "root"),
        ]);
        assert_eq!(t.find(Some("a.example"), "/else"), Some(&"root"));
    }
}
