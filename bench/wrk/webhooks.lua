-- POST signed webhook deliveries from a file, one a line: "<Stripe-Signature>\t<body>".
-- Threads take disjoint turns through the file; at its end they start again.
-- args: deliveries file, number of wrk threads
local deliveries, threads, counter = {}, 1, 0

setup_counter = 0
function setup(thread)
  setup_counter = setup_counter + 1
  thread:set("tid", setup_counter)
end

function init(args)
  threads = tonumber(args[2] or "1")
  for line in io.lines(args[1]) do
    local tab = line:find("\t", 1, true)
    if tab then
      deliveries[#deliveries + 1] = { line:sub(1, tab - 1), line:sub(tab + 1) }
    end
  end
end

function request()
  local index = (counter * threads + tid - 1) % #deliveries + 1
  counter = counter + 1
  local delivery = deliveries[index]
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json; charset=utf-8",
    ["Stripe-Signature"] = delivery[1],
  }, delivery[2])
end
