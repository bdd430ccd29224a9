//! `tideway serve` over TLS and mutual TLS, with certificates made here (rcgen): a client that
//! trusts the server's CA gets in; plain text, an untrusted server certificate, a missing or
//! foreign client certificate do not; SIGHUP swaps the certificates for new connections.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use tideway_proto::tideway::v1 as pb;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate and its key (PEM) for `names`, for a server or a client.
    fn leaf(&self, names: &[&str], purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![purpose];
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn server_files(dir: &Path, ca: &Ca) {
    let (cert, key) = ca.leaf(
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    write(dir, "server.pem", &cert);
    write(dir, "server.key", &key);
}

fn start(dir: &Path, client_ca: Option<&Path>) -> Server {
    let model = format!("lm={}", fixtures_dir().join("mamba/hf_odd_tied").display());
    let cert = dir.join("server.pem");
    let key = dir.join("server.key");
    let mut args = vec![
        "--model",
        &model,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    if let Some(ca) = client_ca {
        args.extend(["--tls-client-ca", ca.to_str().unwrap()]);
    }
    Server::start(&args)
}

/// Lists the models over a connection that trusts `trust` and shows `identity`.
async fn list(
    server: &Server,
    trust: Option<&str>,
    identity: Option<&(String, String)>,
) -> Result<usize, String> {
    let mut tls = ClientTlsConfig::new().domain_name("localhost");
    if let Some(ca) = trust {
        tls = tls.ca_certificate(Certificate::from_pem(ca));
    }
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Channel::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    pb::models_client::ModelsClient::new(channel)
        .list(pb::ListModelsRequest {})
        .await
        .map(|r| r.into_inner().models.len())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_admits_clients_that_trust_the_server() {
    let dir = scratch_dir("tls");
    let ca = Ca::new("tideway test CA");
    server_files(&dir, &ca);
    let server = start(&dir, None);
    assert_eq!(list(&server, Some(&ca.pem()), None).await, Ok(1));
    // A client that trusts another CA does not get in.
    let other = Ca::new("another CA");
    assert!(list(&server, Some(&other.pem()), None).await.is_err());
    // Plain text does not either.
    let plain = pb::models_client::ModelsClient::connect(server.url()).await;
    let refused = match plain {
        Err(_) => true,
        Ok(mut client) => client.list(pb::ListModelsRequest {}).await.is_err(),
    };
    assert!(refused, "a plain-text client was served over the TLS port");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate_from_the_clients_ca() {
    let dir = scratch_dir("mtls");
    let server_ca = Ca::new("server CA");
    server_files(&dir, &server_ca);
    let clients = Ca::new("client CA");
    let client_ca = write(&dir, "clients.pem", &clients.pem());
    let server = start(&dir, Some(&client_ca));
    let good = clients.leaf(&["alice"], ExtendedKeyUsagePurpose::ClientAuth);
    assert_eq!(
        list(&server, Some(&server_ca.pem()), Some(&good)).await,
        Ok(1)
    );
    assert!(list(&server, Some(&server_ca.pem()), None).await.is_err());
    let foreign = Ca::new("foreign CA").leaf(&["mallory"], ExtendedKeyUsagePurpose::ClientAuth);
    assert!(
        list(&server, Some(&server_ca.pem()), Some(&foreign))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificates() {
    let dir = scratch_dir("tls-reload");
    let old = Ca::new("old CA");
    server_files(&dir, &old);
    let server = start(&dir, None);
    assert_eq!(list(&server, Some(&old.pem()), None).await, Ok(1));
    // A renewed certificate from a new CA; a broken file first, which is refused and keeps the
    // old certificate.
    write(&dir, "server.pem", "not a certificate");
    let hangup = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &server.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let wait_for = |needle: &str, count: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while server.stderr().matches(needle).count() < count {
            assert!(std::time::Instant::now() < deadline, "{}", server.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    hangup();
    wait_for("TLS reload failed, keeping the old certificates", 1);
    assert_eq!(list(&server, Some(&old.pem()), None).await, Ok(1));
    let new = Ca::new("new CA");
    server_files(&dir, &new);
    hangup();
    wait_for("TLS certificates reloaded", 1);
    assert_eq!(list(&server, Some(&new.pem()), None).await, Ok(1));
    assert!(list(&server, Some(&old.pem()), None).await.is_err());
}
