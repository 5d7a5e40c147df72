//! TLS to upstreams: a private CA is trusted only when configured; verification is never off.

use crate::harness::*;
use kotaemon_fake_upstream::FakeUpstream;
use std::sync::Arc;

/// A TLS front for the plain fake upstream, with a certificate for 127.0.0.1 signed by a fresh
/// CA. Returns the https base URL and the CA's PEM.
async fn tls_front(fake: &FakeUpstream) -> (String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let server_config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let backend = fake.addr();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (format!("https://127.0.0.1:{port}/v1"), ca_cert.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_ca_is_trusted_only_when_configured() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let (url, ca_pem) = tls_front(&fake).await;
    let dir = std::env::temp_dir().join(format!("kotaemon-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();

    let with_ca = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[pool.health]\nenabled = false\n\
         [[upstreams]]\nname = \"tls-ca\"\nbase_url = \"{url}\"\nca_file = \"{}\"\n",
        ca_file.display()
    );
    let agent = Agent::start_toml(&with_ca).await;
    for stream in [false, true] {
        let reply = agent.chat(ask(stream)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    agent.stop().await;

    let without_ca = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[pool]\nmax_attempts = 1\n[pool.health]\nenabled = false\n\
         [[upstreams]]\nname = \"tls-noca\"\nbase_url = \"{url}\"\n"
    );
    let before = fake.chat_request_count();
    let agent = Agent::start_toml(&without_ca).await;
    let reply = agent.chat(ask(false)).await;
    reply.assert_error(502);
    assert_eq!(reply.error_code(), "upstream_connect", "{}", reply.body);
    assert_eq!(
        fake.chat_request_count(),
        before,
        "nothing was sent over an unverified connection"
    );
    agent.stop().await;

    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let bad = with_ca.replace(
        &ca_file.display().to_string(),
        &not_pem.display().to_string(),
    );
    let config = kotaemon_core::Config::from_toml_str(&bad).unwrap();
    let err = kotaemon_core::App::build(config)
        .err()
        .expect("a CA file without certificates is refused")
        .to_string();
    assert!(err.contains("upstreams[0].ca_file"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
