-- GET /api/v1/projects/{id} with a bearer token: a random (token, project) pair per request.
local entries = {}

function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
  for line in io.lines(args[1]) do
    local token, project = line:match("(%S+) (%S+)")
    if token then entries[#entries + 1] = { "Bearer " .. token, "/api/v1/projects/" .. project } end
  end
end

function request()
  local e = entries[math.random(#entries)]
  return wrk.format("GET", e[2], { ["Authorization"] = e[1] })
end

function done(summary, latency, requests)
  io.write(string.format("non2xx_or_errors=%d\n", summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
