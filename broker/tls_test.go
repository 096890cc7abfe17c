package broker_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	pahopackets "github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/beaconmq/beacon/broker"
	bt "github.com/beaconmq/beacon/broker/brokertest"
)

// selfSigned writes a certificate for 127.0.0.1 and its key, and returns
// their paths and a pool that trusts the certificate.
func selfSigned(t *testing.T) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "beacon test"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

func TestTLSListener(t *testing.T) {
	certFile, keyFile, pool := selfSigned(t)
	b, addr := startBroker(t, func(c *broker.Config) {
		c.MQTT.TLSAddr = "127.0.0.1:0"
		c.MQTT.TLSCert, c.MQTT.TLSKey = certFile, keyFile
	})
	tlsAddr := b.MQTTAddr("tls")

	conn, err := tls.Dial("tcp", tlsAddr, &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	var got []*paho.Publish
	done := make(chan struct{})
	c := paho.NewClient(paho.ClientConfig{
		Conn: pahopackets.NewThreadSafeConn(conn),
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
			got = append(got, pr.Packet)
			close(done)
			return true, nil
		}},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Connect(ctx, &paho.Connect{ClientID: "tls-client", CleanStart: true, KeepAlive: 30}); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Disconnect(&paho.Disconnect{}) }()
	if _, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: "tls/#", QoS: 1}}}); err != nil {
		t.Fatal(err)
	}
	// A plain TCP client on the other listener reaches the TLS subscriber.
	pub := bt.Dial(t, addr, &paho.Connect{ClientID: "tcp-pub", CleanStart: true})
	pub.PublishT(t, &paho.Publish{Topic: "tls/x", QoS: 1, Payload: []byte("secret")})
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("no message over TLS")
	}
	if string(got[0].Payload) != "secret" {
		t.Fatalf("got %q", got[0].Payload)
	}

	// Plain MQTT on the TLS port is not spoken to.
	raw := bt.DialRaw(t, tlsAddr, 4)
	raw.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ClientIdentifier: "plain", Clean: true, Keepalive: 30}})
	if _, err := raw.Read(5 * time.Second); err == nil {
		t.Fatal("plain MQTT answered on the TLS listener")
	}
}

func TestMaxClients(t *testing.T) {
	_, addr := startBroker(t, func(c *broker.Config) { c.MQTT.MaxClients = 2 })
	bt.Dial(t, addr, &paho.Connect{ClientID: "one", CleanStart: true})
	bt.Dial(t, addr, &paho.Connect{ClientID: "two", CleanStart: true})
	third, err := bt.TryDial(addr, &paho.Connect{ClientID: "three", CleanStart: true})
	if err == nil {
		t.Fatal("third client accepted beyond mqtt.max_clients = 2")
	}
	if third.Connack == nil || third.Connack.ReasonCode != packets.ErrServerBusy.Code {
		t.Fatalf("refusal: %v %+v, want CONNACK 0x89 server busy", err, third.Connack)
	}
	v3 := bt.DialRaw(t, addr, 4)
	v3.Send(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ClientIdentifier: "three-v3", Clean: true, Keepalive: 30}})
	if ack := v3.Expect(t, packets.Connack); ack.ReasonCode != 0x03 {
		t.Fatalf("v3.1.1 refusal 0x%02x, want 0x03 server unavailable", ack.ReasonCode)
	}
}

func TestBindErrorNamesKey(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg := bt.Config(t)
	cfg.MQTT.Addr = ln.Addr().String()
	if _, err := broker.New(cfg, bt.Logger(t)); err == nil || !strings.Contains(err.Error(), "mqtt.addr") {
		t.Fatalf("bind to a busy port: %v, want an error naming mqtt.addr", err)
	}
}

func TestSecureWebSocket(t *testing.T) {
	certFile, keyFile, pool := selfSigned(t)
	b, _ := startBroker(t, func(c *broker.Config) {
		c.HTTP.TLSCert, c.HTTP.TLSKey = certFile, keyFile
		c.HTTP.AllowMissingOrigin = true
	})
	d := websocket.Dialer{Subprotocols: []string{"mqtt"}, TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}
	c, _, err := d.Dial("wss://"+b.HTTPAddr()+"/mqtt", nil)
	if err != nil {
		t.Fatalf("wss handshake: %v", err)
	}
	cl := bt.DialPahoWS(t, &bt.WSConn{Conn: c}, &paho.Connect{ClientID: "wss", CleanStart: true, KeepAlive: 30})
	cl.SubscribeT(t, paho.SubscribeOptions{Topic: "wss/#", QoS: 1})
	cl.PublishT(t, &paho.Publish{Topic: "wss/x", QoS: 1, Payload: []byte("secure")})
	if m := cl.WaitMessages(t, 1, 5*time.Second)[0]; string(m.Payload) != "secure" {
		t.Fatalf("got %q", m.Payload)
	}
	// Health checks are served over TLS too.
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	resp, err := hc.Get("https://" + b.HTTPAddr() + "/healthz")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("https healthz: %v %v", err, resp)
	}
	resp.Body.Close()
}
