package broker

import (
	"errors"
	"fmt"

	"github.com/beaconmq/beacon/broker/engine"
	"github.com/beaconmq/beacon/broker/topics"
	"github.com/beaconmq/beacon/storage"
)

// upgradeStats say what a start found of a data directory written by the
// versions of Beacon that ran on mochi's engine.
type upgradeStats struct {
	Retained int // retained messages carried over
	Sessions int // sessions left behind (their clients start clean)
}

// upgradeOldStore carries the retained messages of a data directory that
// the mochi-based versions wrote into the engine (once: the old records
// are removed), and counts the sessions it cannot carry over, so a start
// after an upgrade says what it did instead of starting emptier in
// silence. Run it after the engine loaded its own state.
func (b *Broker) upgradeOldStore() (upgradeStats, error) {
	var st upgradeStats
	var dels []storage.Op
	err := b.db.Scan(storage.RetainedPrefix(), func(k, v []byte) error {
		dels = append(dels, storage.Delete(append([]byte(nil), k...)))
		pk, err := storage.DecodeMessage(v)
		if err != nil || !topics.ValidTopicName(pk.TopicName) || len(pk.Payload) == 0 {
			return nil
		}
		if _, ok := b.retainedPayload(pk.TopicName); ok {
			return nil // the new engine has a newer one
		}
		m := &engine.Message{Topic: pk.TopicName, Payload: pk.Payload, QoS: pk.FixedHeader.Qos, Retain: true,
			PayloadFormat: pk.Properties.PayloadFormat, PayloadFormatSet: pk.Properties.PayloadFormatFlag,
			ContentType: pk.Properties.ContentType, ResponseTopic: pk.Properties.ResponseTopic,
			CorrelationData: pk.Properties.CorrelationData, User: pk.Properties.User}
		if _, err := b.engine.Publish(m); err != nil {
			return fmt.Errorf("carry over retained %q: %w", pk.TopicName, err)
		}
		st.Retained++
		return nil
	})
	if err != nil {
		return st, err
	}
	err = b.db.Scan(storage.ClientPrefix(), func(k, v []byte) error {
		st.Sessions++
		return nil
	})
	if err != nil {
		return st, err
	}
	if len(dels) > 0 {
		if err := b.db.Write(dels...); err != nil {
			return st, errors.Join(errors.New("remove carried-over retained records"), err)
		}
	}
	return st, nil
}
