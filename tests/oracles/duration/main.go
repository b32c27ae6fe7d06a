// Oracle for tests/unit/test_durations.py: reads one string a line, prints time.ParseDuration in ns or ERR.

package main

import (
	"bufio"
	"fmt"
	"os"
	"time"
)

func main() {
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		d, err := time.ParseDuration(in.Text())
		if err != nil {
			fmt.Println("ERR")
		} else {
			fmt.Println(int64(d))
		}
	}
}
