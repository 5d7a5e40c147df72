//! TLS to upstreams: a private CA is trusted only when configured; verification is never off.

use crate::harness::*;
use kotaemon_fake_upstream::FakeUpstream;
use std::sync::Arc;

/// A fresh private CA that signs the front's server certificate and, for mTLS, the device's.
struct Pki {
    ca_pem: String,
    ca_der: tokio_rustls::rustls::pki_types::CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        Pki {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            issuer: rcgen::Issuer::new(ca_params, ca_key),
        }
    }

    /// A certificate for `name` signed by the CA: (certificate PEM, key PEM, key DER).
    fn sign(&self, name: &str, client: bool) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        if client {
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        }
        (params.signed_by(&key, &self.issuer).unwrap(), key)
    }
}

/// A TLS front for the plain fake upstream, with a certificate for 127.0.0.1 signed by `pki`'s
/// CA; with `require_client_cert` it also demands a client certificate from that CA (mTLS).
/// Returns the https base URL.
async fn tls_front(fake: &FakeUpstream, pki: &Pki, require_client_cert: bool) -> String {
    use tokio_rustls::rustls;
    let (cert, key) = pki.sign("127.0.0.1", false);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).unwrap();
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let server_config = builder
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
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
    format!("https://127.0.0.1:{port}/v1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_ca_is_trusted_only_when_configured() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let pki = Pki::new();
    let url = tls_front(&fake, &pki, false).await;
    let ca_pem = pki.ca_pem.clone();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_presents_the_device_certificate_only_when_configured() {
    let fake = FakeUpstream::bind_loopback().await.unwrap();
    let pki = Pki::new();
    let url = tls_front(&fake, &pki, true).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let (device_cert, device_key) = pki.sign("edge-01", true);
    let cert_file = dir.path().join("device.pem");
    let key_file = dir.path().join("device.key");
    std::fs::write(&cert_file, device_cert.pem()).unwrap();
    std::fs::write(&key_file, device_key.serialize_pem()).unwrap();
    let upstream = |extra: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[pool]\nmax_attempts = 1\n[pool.health]\nenabled = false\n\
             [[upstreams]]\nname = \"mtls\"\nbase_url = \"{url}\"\nca_file = {:?}\n{extra}\n",
            ca_file
        )
    };

    // Without a client certificate the handshake fails and nothing reaches the upstream.
    let agent = Agent::start_toml(&upstream("")).await;
    let reply = agent.chat(ask(false)).await;
    reply.assert_error(502);
    assert_eq!(fake.chat_request_count(), 0, "{}", reply.body);
    agent.stop().await;

    let with_identity = upstream(&format!(
        "client_cert_file = {cert_file:?}\nclient_key = \"file:{}\"",
        key_file.display()
    ));
    let agent = Agent::start_toml(&with_identity).await;
    for stream in [false, true] {
        let reply = agent.chat(ask(stream)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    assert_eq!(fake.chat_request_count(), 2);
    agent.stop().await;

    // Half an identity, or a key that is not PEM, is a start-up error naming the key path;
    // the key's content never appears in it.
    let half = upstream(&format!("client_cert_file = {cert_file:?}"));
    let err = kotaemon_core::App::build(kotaemon_core::Config::from_toml_str(&half).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("mTLS needs both client_cert_file and client_key"),
        "{err}"
    );
    std::fs::write(&key_file, "not-a-key-SECRET-77").unwrap();
    let err =
        kotaemon_core::App::build(kotaemon_core::Config::from_toml_str(&with_identity).unwrap())
            .err()
            .unwrap()
            .to_string();
    assert!(err.contains("upstreams[0].client_cert_file"), "{err}");
    assert!(!err.contains("SECRET-77"), "{err}");
}
