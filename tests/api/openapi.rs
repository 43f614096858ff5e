//! `GET /openapi.json`: generated from the handlers' own types, and the router and the
//! document agree both ways.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::helpers::spawn_app;

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

#[tokio::test]
async fn every_route_the_router_serves_is_in_the_document_and_nothing_else() {
    let app = spawn_app(|_| {}).await;
    let doc = app.get("/openapi.json").await;
    assert_eq!(doc.status, 200);
    assert_eq!(doc.header("content-type"), Some("application/json"));
    let doc = doc.body;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    let documented: BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(|m| (path.clone(), (*m).to_owned()))
                .collect::<Vec<_>>()
        })
        .collect();
    // The routes of README's table, each in the document.
    for (path, method) in [
        ("/v1/chat/jobs", "post"),
        ("/v1/chat/jobs/{id}", "get"),
        ("/v1/chat/jobs/{id}", "delete"),
        ("/v1/chat/jobs/{id}/retry", "post"),
        ("/v1/jobs", "get"),
        ("/v1/messages/validate", "post"),
        ("/v1/messages/validate/bulk", "post"),
        ("/v1/queue/stats", "get"),
        ("/v1/queue/pause", "post"),
        ("/v1/queue/resume", "post"),
        ("/v1/interactions", "get"),
        ("/v1/cache", "delete"),
        ("/v1/usage", "get"),
        ("/v1/backup", "get"),
        ("/v1/guilds", "get"),
        ("/v1/guilds/{guild_id}", "put"),
        ("/v1/conversations/{id}", "get"),
        ("/api/chat/bot", "post"),
        ("/api/chat/jobs/{id}", "get"),
        ("/v1/chat/completions", "post"),
        ("/v1/models", "get"),
        ("/metrics", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/openapi.json", "get"),
        ("/", "get"),
        ("/admin", "get"),
        ("/assets/{file}", "get"),
    ] {
        assert!(
            documented.contains(&(path.to_owned(), method.to_owned())),
            "{method} {path} is in the document"
        );
    }
    // Every documented operation is served (never the fallback's "No such route" or 405),
    // and no other method is served on a documented path.
    for (path, item) in paths {
        let url = app.url(
            &path
                .replace("{file}", "style.css")
                .replace("{id}", "00000000-0000-0000-0000-000000000000")
                .replace("{guild_id}", "g"),
        );
        for method in METHODS {
            let request = match method {
                "get" => app.http.get(&url),
                "post" => app.http.post(&url).json(&json!({})),
                "put" => app.http.put(&url).json(&json!({})),
                "delete" => app.http.delete(&url),
                _ => app.http.patch(&url).json(&json!({})),
            };
            let answer = app.send(request).await;
            let fallback =
                answer.status == 404 && answer.body["error"]["message"] == "No such route";
            if item.get(method).is_some() {
                assert!(
                    !fallback && answer.status != 405,
                    "{method} {path} is served: {answer:?}"
                );
            } else {
                assert_eq!(
                    answer.status, 405,
                    "{method} {path} is not served: {answer:?}"
                );
            }
        }
    }
    // The error shape is a named schema every error response refers to.
    let error = &doc["components"]["schemas"]["Error"];
    assert!(error["properties"]["error"].is_object(), "{error}");
    let submit_429 = &paths["/v1/chat/jobs"]["post"]["responses"]["429"];
    assert!(
        submit_429
            .to_string()
            .contains("#/components/schemas/Error"),
        "{submit_429}"
    );
    // Routes exist only through the document's `routes!`: no plain `.route(` in the router.
    let router_source = include_str!("../../src/http/mod.rs");
    assert!(
        !router_source.contains(".route("),
        "every route is registered with routes!"
    );
    app.stop().await;
}

#[tokio::test]
async fn every_reference_in_the_document_resolves() {
    fn refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    out.push(r.clone());
                }
                map.values().for_each(|v| refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let app = spawn_app(|_| {}).await;
    let doc = app.get("/openapi.json").await.body;
    let mut found = Vec::new();
    refs(&doc, &mut found);
    assert!(found.len() > 20, "the document uses named schemas");
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for r in found {
        let name = r
            .strip_prefix("#/components/schemas/")
            .expect("a schema reference");
        assert!(schemas.contains_key(name), "{r} resolves");
    }
    app.stop().await;
}
