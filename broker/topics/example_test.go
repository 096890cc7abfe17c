package topics_test

import (
	"fmt"

	"github.com/beaconmq/beacon/broker/topics"
)

func Example() {
	x := topics.NewIndex()
	for _, sub := range []struct {
		client, filter string
		qos            byte
		id             uint32
		noLocal        bool
	}{
		{"dashboard", "home/+/temp", 0, 1, false},
		{"dashboard", "home/#", 1, 2, false},
		{"thermostat", "home/kitchen/+", 1, 0, true}, // not its own messages
		{"heater", "home/kitchen/temp", 2, 0, false},
		{"logger-1", "$share/loggers/home/#", 0, 0, false},
		{"logger-2", "$share/loggers/home/#", 0, 0, false},
	} {
		group, filter, _, ok := topics.ParseShared(sub.filter)
		if !ok {
			panic("invalid filter " + sub.filter)
		}
		x.Subscribe(topics.Subscription{Client: sub.client, Filter: filter, Group: group, QoS: sub.qos, ID: sub.id, NoLocal: sub.noLocal})
	}

	var m topics.Matches // reuse it: Match does not allocate then
	x.Match("home/kitchen/temp", "thermostat", &m)
	for _, d := range m.Direct {
		fmt.Printf("%s gets it at QoS %d with subscription ids %v\n", d.Client, d.QoS, d.IDs)
	}
	online := func(client string) bool { return client == "logger-2" }
	for _, g := range m.Shared {
		s, _ := g.Pick(0, online)
		fmt.Printf("group %s on %s: %s gets it\n", g.Group, g.Filter, s.Client)
	}
	// Output:
	// heater gets it at QoS 2 with subscription ids []
	// dashboard gets it at QoS 1 with subscription ids [1 2]
	// group loggers on home/#: logger-2 gets it
}

func ExampleRetained() {
	r := topics.NewRetained[string]()
	r.Set("home/kitchen/temp", "21.5")
	r.Set("home/hall/temp", "19.0")
	r.Set("home/kitchen/humidity", "40")
	r.Set("$SYS/uptime", "3600")

	n := 0
	r.Match("home/+/temp", func(topic, v string) bool { n++; return true })
	v, _ := r.Get("home/kitchen/temp")
	fmt.Println(n, "temperatures; the kitchen's is", v)
	r.Match("#", func(topic, v string) bool {
		if topic == "$SYS/uptime" {
			fmt.Println("# matched a $ topic") // it does not
		}
		return true
	})
	// Output:
	// 2 temperatures; the kitchen's is 21.5
}

func ExampleMatch() {
	fmt.Println(topics.Match("sport/+", "sport/"))
	fmt.Println(topics.Match("sport/#", "sport"))
	fmt.Println(topics.Match("+/monitor/Clients", "$SYS/monitor/Clients"))
	// Output:
	// true
	// true
	// false
}
