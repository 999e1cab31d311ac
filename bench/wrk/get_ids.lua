-- GET <base path><id><suffix>, cycling through the payment IDs in a file (one a line).
-- args: bearer token, IDs file, base path, suffix
local token, ids, base, suffix, i = nil, {}, nil, nil, 0

local function read_ids(path)
  local found = {}
  for line in io.lines(path) do
    if line ~= "" then found[#found + 1] = line end
  end
  return found
end

function setup(thread)
  thread:set("offset", math.random(1, 1000))
end

function init(args)
  token, base, suffix = args[1], args[3], args[4] or ""
  ids = read_ids(args[2])
  i = offset or 0
end

function request()
  i = i + 1
  local path = base .. ids[(i % #ids) + 1] .. suffix
  return wrk.format("GET", path, { ["Authorization"] = "Bearer " .. token })
end
