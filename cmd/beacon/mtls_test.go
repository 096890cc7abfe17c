package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// testCA is a certificate authority made for a test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

// serialNumber is a random certificate serial number.
func serialNumber(t *testing.T) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: serialNumber(t), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue signs a leaf certificate and writes NAME.pem and NAME.key in dir.
func (ca *testCA) issue(t *testing.T, dir, name, cn string, dns []string, server bool) (certFile, keyFile string, pair tls.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: serialNumber(t), Subject: pkix.Name{CommonName: cn}, DNSNames: dns,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
	certFile, keyFile = filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")
	if err := os.WriteFile(certFile, certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	pair, err = tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile, pair
}

// tlsAddr is the address of the broker's TLS listener, from its log.
func (p *proc) tlsAddr(t *testing.T) string {
	t.Helper()
	for _, line := range strings.Split(p.Logs(), "\n") {
		var rec struct{ Msg, Addr, Listener string }
		if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "mqtt listening" && rec.Listener == "tls" {
			return rec.Addr
		}
	}
	t.Fatalf("no TLS listener in the log:\n%s", p.Logs())
	return ""
}

// dialTLS connects paho over TLS with an optional client certificate and
// returns the client, or the error of the handshake or the CONNECT.
func dialTLS(addr string, roots *x509.CertPool, cert *tls.Certificate, cp *paho.Connect) (*paho.Client, error) {
	tc := &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}
	if cert != nil {
		tc.Certificates = []tls.Certificate{*cert}
	}
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, tc)
	if err != nil {
		return nil, err
	}
	c := paho.NewClient(paho.ClientConfig{Conn: conn, OnClientError: func(error) {}, PacketTimeout: 10 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cp.KeepAlive = 30
	if ca, err := c.Connect(ctx, cp); err != nil {
		_ = conn.Close()
		if ca != nil {
			return nil, &connackError{ca.ReasonCode, err}
		}
		return nil, err
	}
	return c, nil
}

type connackError struct {
	code byte
	err  error
}

func (e *connackError) Error() string { return e.err.Error() }

// TestTLSClientCertificates: the built broker with mqtt.tls_client_ca
// admits a client whose certificate, from the test CA, names a registered
// device (CN), as that device, with its rules (%u); it refuses a client
// without a certificate (handshake, as tls_require_client_cert asks), one
// from another CA, one naming an unregistered device, and one whose
// CONNECT username is another device. mosquitto_pub and paho are the
// clients.
func TestTLSClientCertificates(t *testing.T) {
	dir := t.TempDir()
	ca, other := newTestCA(t, "beacon test CA"), newTestCA(t, "another CA")
	caFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caFile, ca.pem, 0o600); err != nil {
		t.Fatal(err)
	}
	serverCert, serverKey, _ := ca.issue(t, dir, "server", "beacon", nil, true)
	sensorCert, sensorKey, sensorPair := ca.issue(t, dir, "sensor-1", "sensor-1", nil, false)
	_, _, ghostPair := ca.issue(t, dir, "ghost", "ghost", nil, false)
	otherCert, otherKey, otherPair := other.issue(t, dir, "other-sensor-1", "sensor-1", nil, false)
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)

	data := filepath.Join(dir, "data")
	if code, out := runBin(t, "", "devices", "add", "sensor-1", "--data-dir", data); code != 0 {
		t.Fatalf("add sensor-1: %s", out)
	}
	watcherSecret := "the watcher's chosen secret"
	if code, out := runBin(t, watcherSecret+"\n", "devices", "add", "watcher", "--secret-stdin", "--data-dir", data); code != 0 {
		t.Fatalf("add watcher: %s", out)
	}
	rules := filepath.Join(dir, "acl.yaml")
	if err := os.WriteFile(rules, []byte(migrateRules), 0o600); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "beacon.yaml")
	if err := os.WriteFile(conf, []byte("mqtt:\n  tls_addr: 127.0.0.1:0\n  tls_cert: "+serverCert+"\n  tls_key: "+serverKey+
		"\n  tls_client_ca: "+caFile+"\n  tls_require_client_cert: true\nauth:\n  acl_file: "+rules+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startBeacon(t, data, "--config", conf)
	tlsAddr := p.tlsAddr(t)
	host, port, _ := net.SplitHostPort(tlsAddr)
	pub := bt.RequireTool(t, "mosquitto_pub", "mosquitto-clients")

	watcher := startMosqSub(t, p.mqtt, "-u", "watcher", "-P", watcherSecret, "-q", "1", "-t", "devices/#", "-C", "2", "-F", "%t %p")
	// mosquitto_pub with the device's certificate and no username.
	if out, err := exec.Command(pub, "-h", host, "-p", port, "--cafile", caFile, "--cert", sensorCert, "--key", sensorKey,
		"-q", "1", "-t", "devices/sensor-1/temp", "-m", "21.5").CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_pub with the device certificate: %v: %s", err, out)
	}
	// paho with the same certificate: the rules apply to it as sensor-1.
	c, err := dialTLS(tlsAddr, roots, &sensorPair, &paho.Connect{ClientID: "sensor-1-paho", CleanStart: true})
	if err != nil {
		t.Fatalf("paho with the device certificate: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if r, _ := c.Publish(ctx, &paho.Publish{Topic: "devices/other/temp", QoS: 1, Payload: []byte("x")}); r == nil || r.ReasonCode != 0x87 {
		t.Fatalf("publish under another device: %+v, want 0x87", r)
	}
	if _, err := c.Publish(ctx, &paho.Publish{Topic: "devices/sensor-1/hum", QoS: 1, Payload: []byte("40")}); err != nil {
		t.Fatalf("publish as sensor-1: %v", err)
	}
	_ = c.Disconnect(&paho.Disconnect{})
	if got := strings.Join(watcher.wait(t, 20*time.Second), "|"); got != "devices/sensor-1/temp 21.5|devices/sensor-1/hum 40" {
		t.Fatalf("watcher got %q", got)
	}

	// Refusals.
	for _, tc := range []struct {
		name       string
		args       []string
		cert       *tls.Certificate
		user, pass string
		connack    byte // 0: the handshake fails (or the connection closes before a CONNACK)
	}{
		{name: "no certificate", args: nil},
		{name: "another CA", args: []string{"--cert", otherCert, "--key", otherKey}, cert: &otherPair},
		{name: "an unregistered device", cert: &ghostPair, connack: 0x86},
		{name: "a username of another device", cert: &sensorPair, user: "watcher", pass: watcherSecret, connack: 0x87},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cp := &paho.Connect{ClientID: "refused", CleanStart: true}
			if tc.user != "" {
				cp.Username, cp.UsernameFlag, cp.Password, cp.PasswordFlag = tc.user, true, []byte(tc.pass), true
			}
			c, err := dialTLS(tlsAddr, roots, tc.cert, cp)
			if err == nil {
				_ = c.Disconnect(&paho.Disconnect{})
				t.Fatal("paho connected")
			}
			var ce *connackError
			switch {
			case tc.connack == 0 && errors.As(err, &ce):
				t.Fatalf("got CONNACK 0x%02x, want the TLS handshake refused", ce.code)
			case tc.connack != 0 && (!errors.As(err, &ce) || ce.code != tc.connack):
				t.Fatalf("got %v, want CONNACK 0x%02x", err, tc.connack)
			}
			if tc.connack == 0 {
				args := append([]string{"-h", host, "-p", port, "--cafile", caFile, "-q", "1", "-t", "devices/sensor-1/temp", "-m", "no"}, tc.args...)
				if out, err := exec.Command(pub, args...).CombinedOutput(); err == nil {
					t.Fatalf("mosquitto_pub connected: %s", out)
				}
			}
		})
	}
	if strings.Contains(p.Logs(), watcherSecret) {
		t.Fatal("the broker logged a secret")
	}
}

// TestTLSClientCertificateSAN: with tls_identity san the first DNS name of
// the certificate is the device; without tls_require_client_cert a client
// without a certificate logs in with its password over TLS.
func TestTLSClientCertificateSAN(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t, "beacon test CA")
	caFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caFile, ca.pem, 0o600); err != nil {
		t.Fatal(err)
	}
	serverCert, serverKey, _ := ca.issue(t, dir, "server", "beacon", nil, true)
	_, _, sanPair := ca.issue(t, dir, "san", "not-a-device", []string{"sensor-2", "other.example"}, false)
	_, _, cnPair := ca.issue(t, dir, "cn", "sensor-2", nil, false)
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	data := filepath.Join(dir, "data")
	secret := "sensor-2's chosen secret"
	if code, out := runBin(t, secret+"\n", "devices", "add", "sensor-2", "--secret-stdin", "--data-dir", data); code != 0 {
		t.Fatalf("add: %s", out)
	}
	rules := filepath.Join(dir, "acl.yaml")
	if err := os.WriteFile(rules, []byte(migrateRules), 0o600); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "beacon.yaml")
	if err := os.WriteFile(conf, []byte("mqtt:\n  tls_addr: 127.0.0.1:0\n  tls_cert: "+serverCert+"\n  tls_key: "+serverKey+
		"\n  tls_client_ca: "+caFile+"\n  tls_identity: san\nauth:\n  acl_file: "+rules+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startBeacon(t, data, "--config", conf)
	addr := p.tlsAddr(t)
	c, err := dialTLS(addr, roots, &sanPair, &paho.Connect{ClientID: "san", CleanStart: true})
	if err != nil {
		t.Fatalf("certificate with the device as DNS name: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Publish(ctx, &paho.Publish{Topic: "devices/sensor-2/t", QoS: 1, Payload: []byte("1")}); err != nil {
		t.Fatalf("publish as sensor-2: %v", err)
	}
	_ = c.Disconnect(&paho.Disconnect{})
	// The CN is not the identity in san mode (and names no device).
	if _, err := dialTLS(addr, roots, &cnPair, &paho.Connect{ClientID: "cn", CleanStart: true}); err == nil {
		t.Fatal("a certificate without DNS names was admitted in san mode")
	}
	// No certificate: the password path, over TLS.
	c, err = dialTLS(addr, roots, nil, &paho.Connect{ClientID: "pw", CleanStart: true, Username: "sensor-2", UsernameFlag: true, Password: []byte(secret), PasswordFlag: true})
	if err != nil {
		t.Fatalf("password over TLS without a certificate: %v", err)
	}
	_ = c.Disconnect(&paho.Disconnect{})
	if _, err := dialTLS(addr, roots, nil, &paho.Connect{ClientID: "pw2", CleanStart: true, Username: "sensor-2", UsernameFlag: true, Password: []byte("wrong"), PasswordFlag: true}); err == nil {
		t.Fatal("a wrong password was admitted over TLS")
	}
}
