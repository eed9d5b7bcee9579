//! The committed OpenAPI document describes exactly the routes the router serves.

use std::collections::BTreeSet;

/// `(METHOD, path)` pairs registered in the routers of `src/http/`
/// (`.route("path", get(..).post(..))` inside `Router::new()` chains).
fn router_routes() -> BTreeSet<(String, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/http");
    let mut routers = String::new();
    for entry in std::fs::read_dir(dir).expect("src/http") {
        let source = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        // Each router chain runs from `Router::new()` to the end of its function.
        for chain in source.split("Router::new()").skip(1) {
            routers.push_str(chain.split("\n}\n").next().unwrap());
        }
    }
    let source = routers;
    let mut out = BTreeSet::new();
    for chunk in source.split(".route(").skip(1) {
        let Some(rest) = chunk.trim_start().strip_prefix('"') else {
            continue;
        };
        let (path, handlers) = rest.split_once('"').expect("closing quote");
        // The handler expression ends at the `.route(` that follows (already split off) or at
        // the layer chain.
        let handlers = handlers.split(".layer(").next().unwrap_or(handlers);
        for method in ["get", "post", "put", "patch", "delete"] {
            let called = handlers.contains(&format!(" {method}("))
                || handlers.contains(&format!(".{method}("))
                || handlers.contains(&format!("\n{method}("))
                || handlers
                    .trim_start_matches([',', ' ', '\n'])
                    .starts_with(&format!("{method}("));
            if called {
                out.insert((method.to_uppercase(), path.to_string()));
            }
        }
    }
    out
}

fn documented_routes() -> BTreeSet<(String, String)> {
    let doc: serde_json::Value =
        serde_json::from_str(include_str!("../openapi.json")).expect("openapi.json is JSON");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn every_route_is_documented_and_nothing_else() {
    let served = router_routes();
    let documented = documented_routes();
    assert!(served.len() > 20, "parsed the router: {served:?}");
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "routes missing from openapi.json: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "documented routes the router lacks: {extra:?}"
    );
}
