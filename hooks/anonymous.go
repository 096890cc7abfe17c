package hooks

import (
	"bytes"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Anonymous lets every client connect and use every topic. mochi refuses
// all connections when no hook authenticates, so the broker registers this
// hook in its no-authentication mode (the loopback-only default) and never
// beside a real authenticator: mochi allows when any hook allows.
type Anonymous struct {
	mqtt.HookBase
}

var _ mqtt.Hook = (*Anonymous)(nil)

// ID implements mqtt.Hook.
func (h *Anonymous) ID() string { return "beacon-anonymous" }

// Provides implements mqtt.Hook.
func (h *Anonymous) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnConnectAuthenticate, mqtt.OnACLCheck}, []byte{b})
}

// OnConnectAuthenticate allows the connection.
func (h *Anonymous) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }

// OnACLCheck allows the action.
func (h *Anonymous) OnACLCheck(*mqtt.Client, string, bool) bool { return true }
