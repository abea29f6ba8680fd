-- Argo CD health check for keystone.dev/Processor: its declared contract must
-- agree with its operator.
local hs = {}
local status = obj.status
local generation = obj.metadata and obj.metadata.generation
if status == nil or (generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation)) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to check the processor"
  return hs
end
if status.conditions ~= nil then
  for _, c in ipairs(status.conditions) do
    if c.type == "ContractValid" then
      if c.status == "True" then
        hs.status = "Healthy"
      else
        hs.status = "Degraded"
      end
      hs.message = c.message or c.reason
      return hs
    end
  end
end
hs.status = "Progressing"
hs.message = "Waiting for the operator to check the processor"
return hs
