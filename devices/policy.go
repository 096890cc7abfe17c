package devices

import (
	"errors"
	"fmt"
)

// PublishPolicy is consulted for every publish, after the ACL allowed it,
// with the principal, the topic and the payload. A non-nil error refuses
// the message.
type PublishPolicy interface {
	CheckPublish(p *Principal, topic string, payload []byte) error
}

// ErrPayloadTooLarge is returned by MaxPayload.
var ErrPayloadTooLarge = errors.New("payload too large")

// MaxPayload limits payload sizes per device type, from the max_payload
// section of the rules in force ("*" applies to devices of any type).
type MaxPayload struct{ Authorizer *Authorizer }

var _ PublishPolicy = MaxPayload{}

// CheckPublish implements PublishPolicy.
func (m MaxPayload) CheckPublish(p *Principal, _ string, payload []byte) error {
	if p.Kind != DeviceKind {
		return nil
	}
	limits := m.Authorizer.Rules().MaxPayload
	limit, ok := limits[p.DeviceType]
	if !ok {
		limit = limits["*"]
	}
	if limit > 0 && len(payload) > limit {
		return fmt.Errorf("%w: %d bytes, the limit for device type %q is %d", ErrPayloadTooLarge, len(payload), p.DeviceType, limit)
	}
	return nil
}
