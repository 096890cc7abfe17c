package broker

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"

	"github.com/beaconmq/beacon/devices"
)

// Errors of client-certificate authentication, for logs.
var (
	ErrCertNoIdentity = errors.New("the client certificate names no usable identity")
	ErrCertUsername   = errors.New("the CONNECT username differs from the client certificate's identity")
)

// clientCertConfig makes tc ask for client certificates signed by
// mqtt.tls_client_ca (and require one with mqtt.tls_require_client_cert).
func clientCertConfig(tc *tls.Config, m MQTTConfig) error {
	if m.TLSClientCA == "" {
		return nil
	}
	pem, err := os.ReadFile(m.TLSClientCA)
	if err != nil {
		return &ConfigError{Key: "mqtt.tls_client_ca", Msg: err.Error()}
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return &ConfigError{Key: "mqtt.tls_client_ca", Msg: fmt.Sprintf("%s holds no PEM certificate", m.TLSClientCA)}
	}
	tc.ClientCAs = pool
	tc.ClientAuth = tls.VerifyClientCertIfGiven
	if m.TLSRequireClientCert {
		tc.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return nil
}

// certIdentityOf is the device id a verified client certificate names:
// the subject's common name (cn) or its first DNS name (san).
func certIdentityOf(cert *x509.Certificate, mode string) string {
	if mode == "san" {
		if len(cert.DNSNames) > 0 {
			return cert.DNSNames[0]
		}
		return ""
	}
	return cert.Subject.CommonName
}

// certPrincipal authenticates a connection by its verified TLS client
// certificate: the identity is the device id (the username of the rules'
// %u); the device must be registered and enabled. ok is false when the
// connection carries no verified certificate (then the password path
// applies).
func (a *auth) certPrincipal(conn any, username string) (p devices.Principal, ok bool, err error) {
	tc, isTLS := conn.(*tls.Conn)
	if !isTLS {
		return p, false, nil
	}
	st := tc.ConnectionState()
	if len(st.VerifiedChains) == 0 || len(st.PeerCertificates) == 0 {
		return p, false, nil
	}
	id := certIdentityOf(st.PeerCertificates[0], a.certIdentity)
	if !devices.ValidID(id) {
		return p, true, ErrCertNoIdentity
	}
	if username != "" && username != id {
		return p, true, ErrCertUsername
	}
	d, err := a.registry.Identified(id)
	if err != nil {
		return p, true, err
	}
	return devices.Principal{Kind: devices.DeviceKind, Name: d.ID, DeviceType: d.Type}, true, nil
}
