//! The PostgreSQL store: the contract suite, each test on a database of its own, then the
//! schema's versioning. Needs a server: `CHATQ_TEST_DATABASE_URL` (such as
//! `postgres://postgres@127.0.0.1:5432/postgres`, `.ci/run` sets it); unset, the tests pass
//! at once and say once that they were skipped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{PgStore, schema};
use crate::clock::SharedClock;
use crate::secret::Secret;
use crate::signals::{JobNotifier, Signals};
use crate::store::contract::{self, Backend};
use crate::store::{PostgresOptions, Store, StoreError, StoreOptions};

const URL_VAR: &str = "CHATQ_TEST_DATABASE_URL";

/// Says once per run that the PostgreSQL tests did not run.
fn skipped() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Straight to stderr: the test harness captures `println!` of passing tests.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "PostgreSQL store tests skipped: {URL_VAR} is unset"
        );
    });
}

/// A database of its own on the test server, dropped at the end.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl TestDatabase {
    /// `None` (and a note) when no test server is configured.
    pub async fn create() -> Option<Self> {
        let Ok(admin_url) = std::env::var(URL_VAR) else {
            skipped();
            return None;
        };
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "chatq_test_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            uuid::Uuid::new_v4().simple()
        );
        let (client, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("{URL_VAR} is set but the server is unreachable: {e}"));
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        let mut url = reqwest::Url::parse(&admin_url).expect("a URL in CHATQ_TEST_DATABASE_URL");
        url.set_path(&format!("/{name}"));
        Some(Self {
            admin_url,
            name,
            url: url.to_string(),
        })
    }

    pub fn options(&self) -> PostgresOptions {
        PostgresOptions {
            url: Secret::new(self.url.clone()),
            lease: Duration::from_secs(30),
            replica: "test".to_owned(),
            pool_size: 16,
            ca_file: None,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop needs a runtime of its own: the test's may be shutting down.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let (client, connection) =
                    tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
                        .await
                        .ok()?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        });
        let _ = dropped.join();
    }
}

/// The store on `options`' database as one replica opens it, reporting to `signals`.
async fn open_replica(
    options: &PostgresOptions,
    clock: SharedClock,
    signals: Arc<Signals>,
) -> Result<PgStore, StoreError> {
    PgStore::open(
        StoreOptions::postgres(options.clone()),
        options,
        clock,
        signals,
    )
    .await
}

struct Postgres {
    database: TestDatabase,
}

impl Backend for Postgres {
    fn open(
        &self,
        clock: SharedClock,
        notifier: Arc<dyn JobNotifier>,
    ) -> BoxFuture<'_, Arc<dyn Store>> {
        Box::pin(async move {
            let mut options = StoreOptions::postgres(self.database.options());
            options.keep_completed = 3;
            options.keep_failed = 2;
            options.cache_max_entries = 5;
            let crate::store::Backend::Postgres(pg) = options.backend.clone() else {
                unreachable!("built as postgres")
            };
            let store = PgStore::open(options, &pg, clock, notifier)
                .await
                .expect("open the PostgreSQL store");
            Arc::new(store) as Arc<dyn Store>
        })
    }
}

async fn backend() -> Option<Postgres> {
    Some(Postgres {
        database: TestDatabase::create().await?,
    })
}

contract::store_contract!(backend().await);

#[tokio::test]
async fn a_newer_schema_is_refused_naming_both_versions() {
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    let (mut client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let pool_client = &mut client;
    // First a current schema, then pretend a later release migrated it further.
    let options = database.options();
    let store = open_replica(
        &options,
        crate::clock::system(),
        Arc::new(Signals::default()),
    )
    .await
    .unwrap();
    drop(store);
    pool_client
        .batch_execute("UPDATE chatq_meta SET schema_version = 99")
        .await
        .unwrap();
    let refused = open_replica(
        &options,
        crate::clock::system(),
        Arc::new(Signals::default()),
    )
    .await;
    match refused {
        Err(e @ StoreError::Open { .. }) => {
            let message = e.to_string();
            assert!(message.contains("version 99"), "{message}");
            assert!(
                message.contains(&format!("version {}", schema::VERSION)),
                "{message}"
            );
        }
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a newer schema was accepted"),
    }
}

#[tokio::test]
async fn migrating_twice_or_from_two_replicas_at_once_applies_each_step_once() {
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    let options = database.options();
    let opens: Vec<_> = (0..3)
        .map(|_| {
            let options = options.clone();
            tokio::spawn(async move {
                open_replica(
                    &options,
                    crate::clock::system(),
                    Arc::new(Signals::default()),
                )
                .await
                .map(|_| ())
            })
        })
        .collect();
    for open in opens {
        open.await.unwrap().expect("every replica opens");
    }
    let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let version: i32 = client
        .query_one("SELECT schema_version FROM chatq_meta", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, schema::VERSION);
    let metas: i64 = client
        .query_one("SELECT count(*) FROM chatq_meta", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(metas, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rate_limit_is_one_count_across_replicas() {
    use crate::clock::ManualClock;
    use crate::store::RateLimits;
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    let clock = ManualClock::new(contract::T0);
    let options = database.options();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let store = open_replica(&options, clock.clone(), Arc::new(Signals::default()))
            .await
            .unwrap();
        replicas.push(Arc::new(store));
    }
    let (a, b) = (&replicas[0], &replicas[1]);
    let window = Duration::from_secs(3);
    // 3 per 3 s: one request's worth comes back every second.
    let take = |store: &Arc<PgStore>, key: &'static str| {
        let store = Arc::clone(store);
        async move { store.take(key, 3, window).await.unwrap().unwrap() }
    };
    let first = take(a, "u").await;
    assert!(first.allowed);
    assert_eq!((first.remaining, first.reset_ms), (2, 1_000));
    assert_eq!(take(b, "u").await.remaining, 1);
    let third = take(a, "u").await;
    assert_eq!(
        (third.allowed, third.remaining, third.reset_ms),
        (true, 0, 3_000)
    );
    let refused = take(b, "u").await;
    assert!(!refused.allowed, "the other replica sees the same count");
    assert_eq!((refused.retry_after_ms, refused.reset_ms), (1_000, 3_000));
    assert!(take(b, "someone else").await.allowed);
    clock.advance(999);
    assert!(!take(a, "u").await.allowed, "not before a second");
    clock.advance(1);
    let back = take(a, "u").await;
    assert_eq!((back.allowed, back.remaining), (true, 0));

    // Many requests at once, spread over both replicas: exactly the limit gets through.
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let store = Arc::clone(&replicas[i % 2]);
            tokio::spawn(async move {
                store
                    .take("burst", 10, Duration::from_secs(60))
                    .await
                    .unwrap()
                    .unwrap()
                    .allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        allowed += usize::from(t.await.unwrap());
    }
    assert_eq!(allowed, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_replicas_finishes_and_work_reach_this_ones_waiters() {
    use crate::domain::{JobState, NewJob};
    use crate::store::JobStore;
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    let options = database.options();
    let open = |signals: Arc<Signals>| {
        let options = options.clone();
        async move {
            open_replica(&options, crate::clock::system(), signals)
                .await
                .unwrap()
        }
    };
    let (here, there) = (Arc::new(Signals::default()), Arc::new(Signals::default()));
    let a = open(Arc::clone(&here)).await;
    let b = open(Arc::clone(&there)).await;
    // Let both listeners subscribe before anything is announced.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let woken = here.work.notified();
    tokio::pin!(woken);
    woken.as_mut().enable();
    let job = b.push(NewJob::prompt("u", "from b")).await.unwrap().job;
    tokio::time::timeout(Duration::from_secs(5), woken)
        .await
        .expect("a push on b wakes a's idle workers");

    let mut finished = here.finished.subscribe(job.id);
    let lease = b.claim().await.unwrap().unwrap().lease;
    b.complete(&lease, contract::result("done on b"))
        .await
        .unwrap();
    let heard = tokio::time::timeout(Duration::from_secs(5), finished.finished())
        .await
        .expect("b's finish reaches a's waiter")
        .expect("with the job");
    assert_eq!(heard.state, JobState::Completed);
    assert_eq!(heard.result.unwrap().reply, "done on b");
    drop(a);
}

#[tokio::test]
async fn sslmode_require_encrypts_and_a_ca_file_makes_the_certificate_checked() {
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    let mut options = database.options();
    options.url = Secret::new(format!("{}?sslmode=require", database.url));
    let store = open_replica(
        &options,
        crate::clock::system(),
        Arc::new(Signals::default()),
    )
    .await
    .expect("TLS without verification, as libpq's require");
    let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let encrypted: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'chatq' AND a.datname = current_database() AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "chatq's connections use TLS");
    drop(store);

    // The server's certificate must now chain to the file and name the host: this test
    // server's self-signed certificate names the machine, not 127.0.0.1.
    let Some(certificate) = ["/etc/ssl/certs/ssl-cert-snakeoil.pem"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        return;
    };
    options.url = Secret::new(database.url.clone());
    options.ca_file = Some(certificate.into());
    let refused = open_replica(
        &options,
        crate::clock::system(),
        Arc::new(Signals::default()),
    )
    .await;
    let Err(e) = refused else {
        panic!("a certificate that does not name the host was accepted");
    };
    let message = crate::store::error_chain(&e);
    assert!(message.contains("certificate"), "{message}");
    // The same certificate, with the host it names: verified, and taken.
    if !message.contains("\"localhost\"") {
        return;
    }
    let mut by_name = reqwest::Url::parse(&database.url).unwrap();
    by_name.set_host(Some("localhost")).unwrap();
    options.url = Secret::new(by_name.to_string());
    let verified = open_replica(
        &options,
        crate::clock::system(),
        Arc::new(Signals::default()),
    )
    .await;
    assert!(
        verified.is_ok(),
        "a certificate that names the host is taken"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pushes_share_commits() {
    use crate::domain::NewJob;
    use crate::store::{JobStore, StoreHealth};
    let Some(database) = TestDatabase::create().await else {
        return;
    };
    let options = database.options();
    let store = Arc::new(
        open_replica(
            &options,
            crate::clock::system(),
            Arc::new(Signals::default()),
        )
        .await
        .unwrap(),
    );
    let before = store.status().await.unwrap().commits;
    let pushes: Vec<_> = (0..64)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.push(NewJob::prompt("u", &format!("{i}"))).await })
        })
        .collect();
    for p in pushes {
        assert!(p.await.unwrap().unwrap().created);
    }
    let commits = store.status().await.unwrap().commits - before;
    assert!(commits < 32, "64 concurrent pushes took {commits} commits");
    assert_eq!(store.counts().await.unwrap().queued, 64, "every one is in");
}
