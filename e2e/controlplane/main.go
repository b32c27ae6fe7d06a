// Command controlplane runs a single-node Kubernetes control plane for tests:
// an embedded etcd plus a real kube-apiserver (from k8s.io/kubernetes), both in
// one process, listening on loopback only.
//
// Usage:
//
//	controlplane serve DIR   run in the foreground until SIGTERM/SIGINT
//	controlplane ready DIR   exit 0 if DIR's API server answers /readyz with "ok"
//
// DIR holds everything: pki/ (CA, serving cert, admin client cert, service
// account key), etcd/ (data), ports.json and the admin kubeconfig.
package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	_ "time/tzdata"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: controlplane serve|ready DIR")
		os.Exit(2)
	}
	dir, err := filepath.Abs(os.Args[2])
	if err != nil {
		fatal(err)
	}
	switch os.Args[1] {
	case "serve":
		os.Exit(serve(dir))
	case "ready":
		if err := ready(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	default:
		fmt.Fprintln(os.Stderr, "usage: controlplane serve|ready DIR")
		os.Exit(2)
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "controlplane:", err)
	os.Exit(1)
}

// ports are remembered across restarts so an existing kubeconfig stays valid
// and etcd's stored peer URL keeps matching.
type ports struct {
	APIServer  int `json:"apiserver"`
	EtcdClient int `json:"etcdClient"`
	EtcdPeer   int `json:"etcdPeer"`
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func portFree(p int) bool {
	if p <= 0 {
		return false
	}
	l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
	if err != nil {
		return false
	}
	l.Close()
	return true
}

func loadPorts(dir string) (ports, error) {
	var p ports
	path := filepath.Join(dir, "ports.json")
	if b, err := os.ReadFile(path); err == nil {
		_ = json.Unmarshal(b, &p)
	}
	for _, pp := range []*int{&p.APIServer, &p.EtcdClient, &p.EtcdPeer} {
		if !portFree(*pp) {
			n, err := freePort()
			if err != nil {
				return p, err
			}
			*pp = n
		}
	}
	b, _ := json.MarshalIndent(p, "", "  ")
	return p, os.WriteFile(path, b, 0o600)
}

// ---- PKI -------------------------------------------------------------------

type pki struct {
	dir string
}

func (k pki) path(name string) string { return filepath.Join(k.dir, name) }

func writePEM(path, typ string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}

func readCert(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("%s: no PEM data", path)
	}
	return x509.ParseCertificate(blk.Bytes)
}

func newKey(path string) (*rsa.PrivateKey, error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	return key, writePEM(path, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key))
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	return n
}

// ensure creates the CA, serving cert, admin client cert and service-account
// key once; later runs reuse them.
func (k pki) ensure() error {
	if err := os.MkdirAll(k.dir, 0o700); err != nil {
		return err
	}
	if _, err := os.Stat(k.path("admin.crt")); err == nil {
		return nil
	}
	now := time.Now().Add(-time.Hour)
	until := now.Add(10 * 365 * 24 * time.Hour)
	caKey, err := newKey(k.path("ca.key"))
	if err != nil {
		return err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "modelherd-e2e-ca"},
		NotBefore:             now,
		NotAfter:              until,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	if err := writePEM(k.path("ca.crt"), "CERTIFICATE", caDER); err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	issue := func(name string, tmpl *x509.Certificate) error {
		key, err := newKey(k.path(name + ".key"))
		if err != nil {
			return err
		}
		tmpl.SerialNumber = serial()
		tmpl.NotBefore = now
		tmpl.NotAfter = until
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		return writePEM(k.path(name+".crt"), "CERTIFICATE", der)
	}
	if err := issue("serving", &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.0.0.1")},
	}); err != nil {
		return err
	}
	if _, err := newKey(k.path("sa.key")); err != nil {
		return err
	}
	// admin.crt last: its presence marks the PKI as complete.
	return issue("admin", &x509.Certificate{
		Subject:     pkix.Name{CommonName: "modelherd-admin", Organization: []string{"system:masters"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
}

func b64File(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return base64.StdEncoding.EncodeToString(b), nil
}

func writeKubeconfig(dir string, k pki, server string) error {
	ca, err := b64File(k.path("ca.crt"))
	if err != nil {
		return err
	}
	crt, err := b64File(k.path("admin.crt"))
	if err != nil {
		return err
	}
	key, err := b64File(k.path("admin.key"))
	if err != nil {
		return err
	}
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: modelherd-e2e
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: admin
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: modelherd-e2e
  context:
    cluster: modelherd-e2e
    user: admin
    namespace: default
current-context: modelherd-e2e
`, server, ca, crt, key)
	tmp := filepath.Join(dir, ".kubeconfig.tmp")
	if err := os.WriteFile(tmp, []byte(cfg), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, "kubeconfig"))
}

// ---- serve -----------------------------------------------------------------

// envOr is the value of the environment variable name, or def when it is unset or empty.
func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func startEtcd(dir string, p ports) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Name = "modelherd-e2e"
	cfg.Dir = filepath.Join(dir, "etcd")
	cu, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", p.EtcdClient))
	pu, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", p.EtcdPeer))
	cfg.ListenClientUrls = []url.URL{*cu}
	cfg.AdvertiseClientUrls = []url.URL{*cu}
	cfg.ListenPeerUrls = []url.URL{*pu}
	cfg.AdvertisePeerUrls = []url.URL{*pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "warn"
	// A throw-away test cluster: page cache is enough (a killed process loses
	// nothing; only a kernel crash could).
	cfg.UnsafeNoFsync = true
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case err := <-e.Err():
		e.Close()
		return nil, err
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, errors.New("etcd did not become ready in 60s")
	}
}

func serve(dir string) int {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		fatal(err)
	}
	k := pki{dir: filepath.Join(dir, "pki")}
	if err := k.ensure(); err != nil {
		fatal(fmt.Errorf("pki: %w", err))
	}
	p, err := loadPorts(dir)
	if err != nil {
		fatal(err)
	}
	etcd, err := startEtcd(dir, p)
	if err != nil {
		fatal(fmt.Errorf("etcd: %w", err))
	}
	defer etcd.Close()

	server := fmt.Sprintf("https://127.0.0.1:%d", p.APIServer)
	if err := writeKubeconfig(dir, k, server); err != nil {
		fatal(err)
	}
	args := []string{
		"--etcd-servers=" + fmt.Sprintf("http://127.0.0.1:%d", p.EtcdClient),
		"--bind-address=" + envOr("MODELHERD_CP_BIND_ADDRESS", "127.0.0.1"),
		"--advertise-address=" + envOr("MODELHERD_CP_ADVERTISE_ADDRESS", "127.0.0.1"),
		// real kubelets (e2e/cluster) register their veth IP; logs/exec must dial it, not the node name
		"--kubelet-preferred-address-types=InternalIP,Hostname",
		fmt.Sprintf("--secure-port=%d", p.APIServer),
		"--cert-dir=" + k.dir,
		"--tls-cert-file=" + k.path("serving.crt"),
		"--tls-private-key-file=" + k.path("serving.key"),
		"--client-ca-file=" + k.path("ca.crt"),
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + k.path("sa.key"),
		"--service-account-signing-key-file=" + k.path("sa.key"),
		"--service-cluster-ip-range=10.0.0.0/24",
		"--allow-privileged=true",
		"--endpoint-reconciler-type=none",
		"--profiling=false",
		"--shutdown-delay-duration=0s",
		"--shutdown-send-retry-after=false",
		// e2e/cluster runs kube-controller-manager and enables ServiceAccount admission through this variable.
		"--disable-admission-plugins=" + envOr("MODELHERD_CP_DISABLE_ADMISSION_PLUGINS", "ServiceAccount,TaintNodesByCondition,Priority,DefaultTolerationSeconds,DefaultStorageClass,StorageObjectInUseProtection,PersistentVolumeClaimResize,RuntimeClass,CertificateApproval,CertificateSigning,ClusterTrustBundleAttest,CertificateSubjectRestriction,DefaultIngressClass,PodSecurity"),
	}
	args = append(args, strings.Fields(os.Getenv("MODELHERD_CP_EXTRA_ARGS"))...)
	fmt.Fprintf(os.Stderr, "controlplane: etcd ready on 127.0.0.1:%d, starting kube-apiserver on %s\n", p.EtcdClient, server)
	// NewAPIServerCommand installs the SIGTERM/SIGINT handler; Run returns
	// once the API server has shut down, then the deferred etcd.Close runs.
	cmd := app.NewAPIServerCommand()
	cmd.SetArgs(args)
	code := cli.Run(cmd)
	fmt.Fprintf(os.Stderr, "controlplane: kube-apiserver exited (%d), stopping etcd\n", code)
	return code
}

// ---- ready -----------------------------------------------------------------

func ready(dir string) error {
	k := pki{dir: filepath.Join(dir, "pki")}
	b, err := os.ReadFile(filepath.Join(dir, "ports.json"))
	if err != nil {
		return err
	}
	var p ports
	if err := json.Unmarshal(b, &p); err != nil {
		return err
	}
	ca, err := readCert(k.path("ca.crt"))
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	cert, err := tls.LoadX509KeyPair(k.path("admin.crt"), k.path("admin.key"))
	if err != nil {
		return err
	}
	c := &http.Client{
		Timeout: 3 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs:      pool,
			Certificates: []tls.Certificate{cert},
		}},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("https://127.0.0.1:%d/readyz", p.APIServer), nil)
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK || strings.TrimSpace(string(body)) != "ok" {
		return fmt.Errorf("readyz: %d %s", resp.StatusCode, strings.TrimSpace(string(body)))
	}
	return nil
}
