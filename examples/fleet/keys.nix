# Public keys only. The publisher's secret lives in CI (the ROOST_PUBLISHER_KEY secret); each
# node makes its own key on first start and `roost-agent key` prints the public half to paste
# here, which pins it: the coordinator then accepts reports signed by that key alone.
{
  publisher = "acme-fleet-publisher-1:SDxE36woK0LjYG9a+Slig9w7xynOiZ6BorenkMAw9yk=";
  nodes = {
    anna-laptop = "anna-laptop:7AzfOSZmXWkGpKZqzZA9NA6Mg3DHXG2ZYFT7ibjaghs=";
    ben-laptop = "ben-laptop:cpkql2CORO+hko9Stm2kW1B5GtqYIGHe+nn/z7KCSlM=";
    pi-kitchen = "pi-kitchen:oqoY+8Lq+TVVPnXItBYg8RrorqchsnxUCl5jUvPxYro=";
    pi-garage = "pi-garage:fvVSkfc31bm7/xXGByDPrN3bpCSAyYdo8gv1MBrxoWI=";
  };
}
